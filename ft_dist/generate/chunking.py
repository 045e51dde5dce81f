"""Documents cut into overlapping windows of the generator's tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

from ft_dist.generate.documents import Document


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    """`<document id>#<index>`: stable across runs, the unit of resumption."""
    doc_id: str
    index: int
    text: str


def chunk_documents(docs: List[Document], tokenizer: Any, size: int, overlap: int) -> List[Chunk]:
    """Windows of `size` tokens, each starting `size - overlap` tokens after the previous one, decoded back to text
    through the tokenizer's offsets so no character is altered."""
    step = max(size - overlap, 1)
    chunks: List[Chunk] = []
    for doc in docs:
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        starts = range(0, max(len(offsets) - overlap, 1), step) if len(offsets) > size else [0]
        for i, start in enumerate(starts):
            window = offsets[start : start + size]
            if not window:
                continue
            text = doc.text[window[0][0] : window[-1][1]].strip()
            if text:
                chunks.append(Chunk(f"{doc.doc_id}#{i}", doc.doc_id, i, text))
    return chunks
