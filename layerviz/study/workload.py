"""What a study's stages will process, known before any weights are loaded: a model's per-layer costs
from its config on the meta device (``Shape``), and a dataset's users, candidate lists, probe
prompts and training windows as the run will draw them, with their tokens counted (``Data``). The
cost plan (``cost.py``) builds on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from layerviz import arch
from layerviz.bench import flops_per_token, layer_costs
from layerviz.data import CandidateConfig, build_candidates, load
from layerviz.data.prompts import Prompt, PromptConfig, build_probes
from layerviz.evaluate import requests_for
from layerviz.models import PRESETS
from layerviz.study.config import StudyConfig
from layerviz.training import training_windows


class Shape:
    """A model's per-layer costs from its config on the meta device (no weights are read)."""

    def __init__(self, spec: str):
        if spec in PRESETS:
            config = PRESETS[spec].config()
        else:
            config = AutoConfig.from_pretrained(spec)  # a local folder, or the hub cache
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        self.n, self.costs = arch.num_layers(model), layer_costs(model)

    def forward(self, tokens: float, head_tokens: float, layers: float | None = None) -> float:
        """FLOPs of a sequence of ``tokens`` through ``layers`` of the layers (default all), with
        ``head_tokens`` of them through the LM head."""
        parts = flops_per_token(self.costs, list(range(self.n)), max(1, int(round(tokens))))
        frac = 1.0 if layers is None else layers / self.n
        return tokens * (parts["layers"] + parts["attention"]) * frac + head_tokens * parts["head"]


@dataclass
class Users:
    """The scoring work of one evaluation: users, candidates, distinct titles, mean tokens."""

    users: int
    candidates: int
    titles: int
    prefix_tokens: float
    title_tokens: float
    empty_tokens: int  # the prompt of an empty history (pmi priors)


class Data:
    """One dataset as the run will see it: its users, candidate lists and prompts (tokens counted)."""

    def __init__(self, cfg: StudyConfig, dataset: str, tokenizer):
        self.cfg = cfg
        self.prep = load(dataset, "auto", cfg.prep_config(), report=None)
        self.tok = tokenizer
        self.text = Prompt(tokenizer, PromptConfig(self.prep.domain, cfg.max_title_tokens))

    @cache  # noqa: B019 (one Data per dataset and plan)
    def users(self, split: str, n: int, negatives: int, cold: bool = False) -> Users:
        cands = build_candidates(self.prep, CandidateConfig(negatives, "uniform", n, split, self.cfg.seed, cold))
        reqs = requests_for(self.prep, cands, split)
        titles = [t for r in reqs for t in r.candidates]
        return Users(len(reqs), len(titles), len(set(titles)),
                     float(np.mean([len(self.text.prefix(r.history, "likelihood")) for r in reqs])),
                     float(np.mean([len(self.text.title_ids(t)) for t in titles])),
                     len(self.text.prefix([], "likelihood")))

    @cache  # noqa: B019
    def probes(self, n: int) -> tuple[int, float, float]:
        """(prompts, mean tokens, mean target tokens) of the probe set of ``n`` prompts."""
        cal = build_probes(self.prep, self.tok, n, "valid", "likelihood", self.cfg.max_title_tokens, self.cfg.seed)
        return (len(cal.examples), float(np.mean([len(e.ids) for e in cal.examples])),
                float(np.mean([e.n_target for e in cal.examples])))

    @cache  # noqa: B019
    def windows(self, history_len: int, min_history: int) -> int:
        return len(training_windows(self.prep, history_len, min_history))
