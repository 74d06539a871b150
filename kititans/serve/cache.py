"""Prompt caching that leaks nothing across clients.

A finished sequence is kept (its runtime state stays alive) under the key of the client that made it: the
API key it authenticated with (hashed) plus the conversation id it named (`prompt_cache_key`, or `user`).
A later request under the same key continues that state: cut back to the tokens its prompt shares with the
kept ones (a KV cache can go back; a recurrent state, Titans, only when the kept tokens are all shared), it
feeds only the rest. A request that names no conversation is never cached and never reuses anything, and no
request can reach another key's entry, so neither the answer nor its timing depends on what other clients
sent. Entries are evicted least recently used when the runtime needs the room.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


def tenant_key(api_token: str, conversation: str | None) -> str | None:
    """The cache key of a request, or None (no caching) when it names no conversation."""
    if not conversation:
        return None
    return hashlib.sha256(f"{api_token}\0{conversation}".encode()).hexdigest()


@dataclass
class Entry:
    seq: int
    tokens: list[int]  # what the sequence's state holds


class PromptCache:
    def __init__(self, slots: int):
        self.slots = slots
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self.entries)

    def take(self, key: str | None, prompt: list[int]) -> tuple[Entry | None, int]:
        """(the key's entry, or None; how many of its first tokens the prompt shares, less than the
        prompt's length so at least one token is fed). The entry is taken out: the caller continues it (after
        cutting it back to the shared tokens) or drops it."""
        if key is None or key not in self.entries:
            return None, 0
        entry = self.entries.pop(key)
        n = 0
        for a, b in zip(entry.tokens, prompt[:-1]):
            if a != b:
                break
            n += 1
        return entry, n

    def put(self, key: str | None, seq: int, tokens: list[int]) -> list[int]:
        """Keep `seq` under `key`; returns the sequences to drop (a replaced entry, the least recently used
        beyond the slots; with no key or no slots, `seq` itself)."""
        if key is None or self.slots < 1:
            return [seq]
        drop = [self.entries.pop(key).seq] if key in self.entries else []
        self.entries[key] = Entry(seq, list(tokens))
        while len(self.entries) > self.slots:
            drop.append(self.entries.popitem(last=False)[1].seq)
        return drop

    def evict(self) -> int | None:
        """The least recently used entry's sequence (to make room), or None."""
        return self.entries.popitem(last=False)[1].seq if self.entries else None
