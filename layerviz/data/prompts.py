"""Prompts: how a user's history and a candidate item become token ids, and the probe prompts.

``Prompt`` is the one prompt builder: scoring, fine-tuning, healing and the probe prompts all build their token
ids here, so a prompt string is never written twice. The *probe prompts* (``build_probes``) are held-out users'
histories followed by their target title: what importance, selection and adapter training run through a model
to read its activations and its loss. (Not to be confused with *calibration*, which is only ever the PMI
correction of likelihood scores: ``ScoringConfig.calibration``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPTS = {
    "products": dict(
        header="A customer bought these products, oldest first:",
        question="Will the customer buy this product next? Answer Yes or No.",
    ),
    "movies": dict(
        header="A user watched and liked these movies, oldest first:",
        question="Will the user like this movie next? Answer Yes or No.",
    ),
}
"""The two wordings measured since the start; every other item noun gets ``prompt_text``'s generic one."""


def prompt_text(noun: str) -> dict[str, str]:
    """Header and yes/no question for items called ``noun`` ('games', or 'game/games' with its singular)."""
    if noun in PROMPTS:
        return PROMPTS[noun]
    one, _, many = noun.partition("/")
    if not many:
        many, one = one, one[:-1] if one.endswith("s") and len(one) > 1 else one
    if not one.strip() or not many.strip():
        raise ValueError(f"item noun {noun!r}: give a plural such as 'games', or 'singular/plural'")
    return dict(header=f"A user liked these {many}, oldest first:",
                question=f"Will the user like this {one} next? Answer Yes or No.")


@dataclass
class PromptConfig:
    """What a prompt depends on (``ScoringConfig`` has the same two fields)."""

    domain: str = "products"
    """The item noun: 'products' and 'movies' have their own wording, any other plural a generic one."""
    max_title_tokens: int = 32
    """Each title is cut to at most this many tokens, in the history and as a candidate."""


class Prompt:
    """The one prompt builder: header, history, candidate and answer templates per domain.

    Scoring, the probe prompts, fine-tuning and healing all build their token ids here, so a
    prompt string is never written twice. Title and template tokenization is memoized (titles truncated).
    """

    def __init__(self, tokenizer, cfg: PromptConfig):  # or a ScoringConfig: the same two fields
        self.tok, self.cfg, self.p = tokenizer, cfg, prompt_text(cfg.domain)
        self._ids: dict[str, list[int]] = {}
        self._literal: dict[tuple[str, bool], list[int]] = {}

    def title_ids(self, title: str) -> list[int]:
        """Token ids of ' ' + title, cut to max_title_tokens; an empty title is read as ' ?'."""
        if title not in self._ids:
            ids = self.tok(" " + title, add_special_tokens=False).input_ids[: self.cfg.max_title_tokens]
            self._ids[title] = ids or self.tok(" ?", add_special_tokens=False).input_ids
        return self._ids[title]

    def prefix_segments(self, history: list[str], tail: str) -> tuple[list[int], list[bool]]:
        """Prompt ids built segment by segment, and which of them are item-title tokens.

        header (with BOS where the model has one), then '\n-' + title ids per history item,
        then ``tail``. Segment-wise tokenization keeps titles identical wherever they appear.
        """
        ids = self.ids(self.p["header"], special=True)
        is_item = [False] * len(ids)
        dash = self.ids("\n-")
        for t in history:
            title = self.title_ids(t)
            ids += dash + title
            is_item += [False] * len(dash) + [True] * len(title)
        if tail:
            end = self.ids(tail)
            ids += end
            is_item += [False] * len(end)
        return ids, is_item

    def prefix_ids(self, history: list[str], tail: str) -> list[int]:
        return self.prefix_segments(history, tail)[0]

    def ids(self, text: str, special: bool = False) -> list[int]:
        """Token ids of a template string (``special``: with the model's BOS), memoized; a fresh list."""
        if (text, special) not in self._literal:
            self._literal[text, special] = self.tok(text, add_special_tokens=special).input_ids
        return list(self._literal[text, special])

    def likelihood_prefix(self, history: list[str]) -> list[int]:
        """The history prompt that a candidate title continues (likelihood scorer)."""
        return self.prefix_ids(history, "\n-")

    def yesno_prefix(self, history: list[str]) -> list[int]:
        """The history part of the yes/no prompt (shared by all of a user's candidates)."""
        return self.prefix_ids(history, "\n")

    def yesno_suffix(self, title: str) -> list[int]:
        """Candidate line, question and answer cue after the yes/no prefix; the answer is read at its end."""
        return self.ids("Candidate:") + self.title_ids(title) + self.ids(f"\n{self.p['question']}\nAnswer:")

    def prefix(self, history: list[str], scorer: str) -> list[int]:
        """The part of a ``scorer`` prompt shared by all of a user's candidates."""
        return self.likelihood_prefix(history) if scorer == "likelihood" else self.yesno_prefix(history)

    def block(self, title: str, scorer: str) -> list[int]:
        """One candidate's part of a ``scorer`` prompt, after the shared prefix."""
        return self.title_ids(title) if scorer == "likelihood" else self.yesno_suffix(title)


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """First token of ' Yes' and of ' No' (they must differ)."""
    yes = tokenizer(" Yes", add_special_tokens=False).input_ids[0]
    no = tokenizer(" No", add_special_tokens=False).input_ids[0]
    if yes == no:
        raise ValueError("the tokenizer maps ' Yes' and ' No' to the same first token; "
                         "the yesno scorer cannot be used with it")
    return yes, no


@dataclass
class ProbePrompt:
    """One probe prompt: token ids, which of them are item-title tokens, and the loss target."""

    ids: list[int]
    item_mask: list[bool]
    n_target: int = 0  # likelihood: the last n_target ids are the positive title
    label: int | None = None  # yesno: 1 = Yes (the positive), 0 = No (a sampled negative)


@dataclass
class ProbeSet:
    """Probe prompts plus what their loss is."""

    examples: list[ProbePrompt]
    loss: str  # "likelihood" | "yesno"
    yes_no: tuple[int, int] | None = None


def build_probes(prep, tokenizer, n: int = 128, split: str = "valid", loss: str = "likelihood",
                      max_title_tokens: int = 32, seed: int = 0) -> ProbeSet:
    """Probe prompts from held-out interactions (validation targets by default): seeded users' histories, each
    followed by its target title (``likelihood``) or by a candidate and the yes/no question (``yesno``, every second
    candidate a sampled negative)."""
    if loss not in ("likelihood", "yesno"):
        raise ValueError(f"unknown probe loss {loss!r}; use 'likelihood' or 'yesno'")
    if n < 1:
        raise ValueError(f"the probe set is empty (n={n}); ask for at least one sample")
    text = Prompt(tokenizer, PromptConfig(prep.domain, max_title_tokens))
    rng = np.random.default_rng(seed)
    targets = prep.targets(split)
    users = np.sort(rng.choice(targets.index.to_numpy(), size=min(n, len(targets)), replace=False))
    titles, hist, seen = prep.titles(), prep.histories(split), prep.seen_by_user()
    items = prep.items["item_id"].to_numpy()
    out = []
    for k, u in enumerate(users):
        history = [titles[i] for i in hist[u]]
        if loss == "likelihood":
            ids, mask = text.prefix_segments(history, "\n-")
            tgt = text.title_ids(titles[targets[u]])
            out.append(ProbePrompt(ids + tgt, mask + [True] * len(tgt), n_target=len(tgt)))
        else:
            label = k % 2
            item = targets[u]
            while not label and (item in seen.get(u, ()) or item == targets[u]):
                item = items[rng.integers(len(items))]
            ids, mask = text.prefix_segments(history, "\n")
            cand, title = text.ids("Candidate:"), text.title_ids(titles[item])
            suffix = text.yesno_suffix(titles[item])  # = cand + title + question tail
            tail = len(suffix) - len(cand) - len(title)
            out.append(ProbePrompt(ids + suffix, mask + [False] * len(cand) + [True] * len(title) + [False] * tail,
                                  label=label))
    if not out:
        raise ValueError(f"the probe set is empty: split {split!r} has no users")
    return ProbeSet(out, loss, yes_no_ids(tokenizer) if loss == "yesno" else None)


