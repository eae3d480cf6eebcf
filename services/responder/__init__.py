"""The responder: answers each batch through OpenAI in the customer's conversation, once.

docs/design.md, "responder".
"""
