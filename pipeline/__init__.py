"""Train-time loading: shards -> DALI -> one batch contract handed to torch."""
