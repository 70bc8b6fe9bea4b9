"""A photo's way to an embedding: decode, batch, embed, and the pipeline that calls the decision."""
