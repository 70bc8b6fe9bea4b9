"""The gallery on Milvus: replicas sharing one collection pair."""
