"""toolkit on Ray (`pip install "toolkit-embeddings[ray]"`): Ray runs the actors and routes the
traffic; each actor holds the same engine the server runs.

- `toolkit.ray.data`: embed a `ray.data.Dataset` (`embed_dataset`, or `EmbedBatches` for
  `map_batches`), one `toolkit.Engine` per actor.
- `toolkit.ray.serve`: a Ray Serve deployment of the server's own HTTP app (`embedding_app`).
"""
