"""From embeddings to an answer: scorers, rules, rank answers, observations, the prior."""
