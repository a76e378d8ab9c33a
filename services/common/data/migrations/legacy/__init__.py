"""The single migration chain of earlier versions, frozen at 0530.

Used only to bring an old database to 0530 before it is carried over to the
per-service branches (:func:`services.common.data.schema.migrate`).  Never add to it.
"""
