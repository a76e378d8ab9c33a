"""Message schemas and the bus topology shared by every Retrace Server service."""
