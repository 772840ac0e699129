"""Using a trained model: `api` (load, generate, discriminate, embed),
`export` (embeddings of every site, multi-device and multi-host), `samples`
(image files)."""
