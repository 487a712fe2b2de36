"""The request side: a model's files, tokenization, validation, and the `InferenceService` that
turns a request into work for the batch queue. No torch here: front-end processes run it."""
