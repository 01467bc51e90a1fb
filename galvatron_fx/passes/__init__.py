"""Graph passes, one per file; `manager` holds the machinery that runs and checks them."""
