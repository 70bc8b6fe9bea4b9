"""The gallery on FAISS over SQLite: one machine, durable, snapshotted."""
