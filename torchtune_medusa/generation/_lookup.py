# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Lookup drafts: candidate continuations copied from the text so far (prompt lookup decoding, Saxena 2023).

Replies repeat their prompt and themselves: names, code, lists, and on small models whole sentences. When the last
few tokens occurred before, the tokens that followed them then are a free guess at what follows now. A tree step
verifies that guess as one more branch below the root, next to the heads' candidates, so it costs only the extra
tree tokens and never changes the output (the base model still decides every token).
"""

from typing import Dict, List, Sequence, Tuple

#: Draft tokens per step (``medusa_generate(lookup_tokens=...)``). With `make demo`'s heads on its 16 held-out
#: benchmark prompts x 128 tokens (bf16, 1 CPU thread), drafts of 3 / 4 / 6 / 8 tokens decoded at 1.73x / 1.77x /
#: 1.84x / 1.91x against 1.43x without (``benchmarks/results/lookup_tokens_smollm2_cpu.json``); 8 over 6 is within
#: that machine's run-to-run spread, and every drafted step pays for the longer chain.
DEFAULT_LOOKUP_TOKENS = 6
#: ``(shortest, longest)`` suffix a draft matches, longest first. One-token matches drafted in twice as many steps
#: and added no accepted tokens on those replies (tau 2.03 against 2.05 with 4 tokens), so the shortest is 2.
DEFAULT_LOOKUP_NGRAM = (2, 3)


class PromptLookup:
    """An n-gram index over one sequence's tokens that drafts the continuation of its current suffix.

    For each ``n`` in ``min_ngram..max_ngram`` the index maps an n-gram to where the tokens after its latest
    occurrence start; :meth:`draft` looks up the sequence's last ``n`` tokens, longest first, among earlier
    occurrences. Updates cost ``max_ngram`` dictionary writes per token, a draft at most as many lookups.

    Args:
        tokens (Sequence[int]): the sequence so far (the prompt).
        ngram (Tuple[int, int]): ``(min_ngram, max_ngram)``, the shortest and longest suffix matched,
            ``1 <= min_ngram <= max_ngram``. Default ``(2, 3)``.

    Raises:
        ValueError: for an ``ngram`` that is not two such integers.
    """

    def __init__(self, tokens: Sequence[int] = (), *, ngram: Sequence[int] = DEFAULT_LOOKUP_NGRAM) -> None:
        self.min_ngram, self.max_ngram = check_ngram(ngram)
        self.tokens: List[int] = []
        # n-gram -> start of the tokens that followed its latest occurrence; an n-gram is indexed once a token
        # follows it, so the sequence's own suffix never matches itself
        self._next: Dict[Tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the sequence."""
        for token in tokens:
            end = len(self.tokens)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._next[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(int(token))

    def draft(self, num_tokens: int) -> List[int]:
        """Up to ``num_tokens`` tokens that followed the latest earlier occurrence of the sequence's longest
        matching suffix, or ``[]`` when no suffix occurred before.

        A continuation that runs into the current suffix goes on with the draft itself, as a repeating loop
        would, so a match always gives ``num_tokens`` tokens.
        """
        end = len(self.tokens)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            start = self._next.get(tuple(self.tokens[end - n :]))
            if start is None:
                continue
            draft: List[int] = []
            for i in range(start, start + num_tokens):
                draft.append(self.tokens[i] if i < end else draft[i - end])
            return draft
        return []


def check_lookup_tokens(lookup_tokens, name: str = "lookup_tokens") -> int:
    """``lookup_tokens`` as an int >= 0; ``name`` is how the caller's user spells the setting.

    Raises:
        ValueError: for anything but an integer >= 0 (a bool is not one).
    """
    if isinstance(lookup_tokens, bool) or not isinstance(lookup_tokens, int) or lookup_tokens < 0:
        raise ValueError(
            f"{name}={lookup_tokens!r}: must be an integer >= 0 (tokens of a lookup draft per decoding step; 0 decodes "
            "with the heads alone)"
        )
    return lookup_tokens


def check_ngram(ngram: Sequence[int]) -> Tuple[int, int]:
    """``ngram`` as ``(min_ngram, max_ngram)``.

    Raises:
        ValueError: unless it is two integers with ``1 <= min_ngram <= max_ngram``.
    """
    values = list(ngram) if isinstance(ngram, (list, tuple)) else None
    if (
        values is None
        or len(values) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in values)
        or not 1 <= values[0] <= values[1]
    ):
        raise ValueError(
            f"lookup_ngram must be [shortest, longest] suffix lengths with 1 <= shortest <= longest, got {ngram!r}; "
            f"e.g. {list(DEFAULT_LOOKUP_NGRAM)}"
        )
    return values[0], values[1]
