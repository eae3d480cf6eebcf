"""Vision service: classifies the images of a batch outside the customer's conversation, then
forwards the batch to the responder with the images as OpenAI file ids (see `worker.py`)."""
