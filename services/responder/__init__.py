"""The responder: answers each batch through OpenAI in the customer's conversation, once (DESIGN.md 3)."""
