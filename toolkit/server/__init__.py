"""The HTTP layer: FastAPI routes, request schemas and the one error handler."""
