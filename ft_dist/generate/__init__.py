"""`ft-data generate`: documents in, training-ready Q&A JSONL out.

documents.py (files to texts) -> chunking.py (token windows) -> prompt.py (the request) -> backends.py (a local
HF model or an OpenAI-compatible endpoint) -> replies.py (strict parsing) -> filters.py (quality filters) ->
output.py (append-only parts, the merged output, the report). pipeline.py wires them; schema.py is the config.
"""
