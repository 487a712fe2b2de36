"""The HTTP layer: routes, request schemas, the error table and middleware. No torch here."""
