"""What a request may do: ownership, limits and validation, above the store; the only writer of
served state. No HTTP here: the service maps these calls to routes."""
