"""The provider registry: the ONE place where the messaging platforms are listed.

Every service asks it, never a channel's name: ingest mounts `/webhooks/<name>` per provider and
parses with it; the responder finds the provider of a request's channel to split and send; vision
to fetch media; the context service to know whether (and how) history can be read; customer keys
(`<name>:<id>`) are valid for the registered names. docs/providers.md: adding a provider.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.common import keys

from .base import Provider
from .manychat import ManyChatProvider
from .wati import WatiProvider

_BY_NAME: dict[str, Provider] = {}
_BY_CHANNEL: dict[str, Provider] = {}
#: the providers configured by settings of their own (`token_setting`), and their names: kept with
#: the registrations, as ingest asks for them on every webhook (services/common/config.py)
_CONFIGURABLE: tuple[Provider, ...] = ()
_CONFIGURABLE_NAMES: tuple[str, ...] = ()


class UnknownProvider(LookupError):
    """No registered provider has this name, channel or key prefix."""


def register(provider: Provider) -> Provider:
    """Adds a provider; its name and channels must be new. Returns it (usable as a decorator)."""
    if provider.name in _BY_NAME:
        raise ValueError(f"provider {provider.name!r} is already registered")
    taken = [c for c in provider.channels if c in _BY_CHANNEL]
    if taken:
        raise ValueError(f"channel(s) {taken} already belong to another provider")
    _BY_NAME[provider.name] = provider
    for channel in provider.channels:
        _BY_CHANNEL[channel] = provider
    keys.PROVIDER_PREFIXES.add(provider.name)
    _configurable_changed()
    return provider


def unregister(name: str) -> None:
    """Removes a provider (tests registering a stand-in provider clean up with this)."""
    provider = _BY_NAME.pop(name)
    for channel in provider.channels:
        _BY_CHANNEL.pop(channel, None)
    keys.PROVIDER_PREFIXES.discard(name)
    _configurable_changed()


def _configurable_changed() -> None:
    global _CONFIGURABLE, _CONFIGURABLE_NAMES
    _CONFIGURABLE = tuple(p for p in _BY_NAME.values() if p.token_setting)
    _CONFIGURABLE_NAMES = tuple(p.name for p in _CONFIGURABLE)


def configurable() -> tuple[Provider, ...]:
    """The providers configured by settings of their own, in registration order: the channels the
    CHANNELS setting names (a provider without settings is enabled by its registration)."""
    return _CONFIGURABLE


def configurable_names() -> tuple[str, ...]:
    """The names of `configurable()`."""
    return _CONFIGURABLE_NAMES


def providers() -> list[Provider]:
    """Every registered provider, in registration order."""
    return list(_BY_NAME.values())


def by_name(name: str) -> Provider:
    """The provider of a key prefix or webhook route segment."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownProvider(f"no provider named {name!r}") from None


def for_channel(channel: str) -> Provider:
    """The provider that answers on a `Channel` symbol."""
    try:
        return _BY_CHANNEL[channel]
    except KeyError:
        raise UnknownProvider(f"no provider for channel {channel!r}") from None


def for_client(client: object) -> Provider:
    """The provider whose `open_client` makes clients of this type."""
    for provider in _BY_NAME.values():
        if isinstance(client, provider.client_type):
            return provider
    raise UnknownProvider(f"no provider uses a {type(client).__name__}")


def channels() -> Iterable[str]:
    """Every channel a registered provider answers on."""
    return list(_BY_CHANNEL)


def has_history(channel: str | None) -> bool:
    """Whether the channel's provider can read a conversation's history (False when unknown)."""
    provider = _BY_CHANNEL.get(channel or "")
    return provider is not None and provider.has_history


# -- the registrations: one line per provider -------------------------------------------------------
register(WatiProvider())
register(ManyChatProvider())
