# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Generate text with a Medusa model (tree decoding with KV-cache eviction), optionally side by side with the
autoregressive baseline on the same model and cache code, and write the statistics as JSON.

    tune run medusa_generate --config smollm2/135M_generate
    tune run medusa_generate --config smollm2/135M_generate prompts='["Write a haiku about rain."]'
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchtune import config, training, utils
from torchtune.data import Message

from torchtune_medusa._config import register_resolvers
from torchtune_medusa.generation import generate, medusa_generate, resolve_choices

register_resolvers()
logger = utils.get_logger("INFO")

ACCEPTANCE_RULES = ("greedy", "typical")


def load_tree(medusa_choices: Any) -> Any:
    """A tree name (``mc_sim_7b_63``, ``chain4``), a list of rank paths, or the path of a tree JSON (as saved with
    trained heads: ``{"medusa_choices": [...], ...}``)."""
    if isinstance(medusa_choices, str) and medusa_choices.endswith(".json"):
        path = Path(medusa_choices).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"medusa_choices={medusa_choices!r}: no such tree file")
        return json.loads(path.read_text())["medusa_choices"]
    if isinstance(medusa_choices, ListConfig):
        return OmegaConf.to_container(medusa_choices)
    return resolve_choices(medusa_choices)


def read_prompts(cfg: DictConfig) -> List[str]:
    """``prompts`` (a list of strings) and/or ``prompt_file`` (one prompt per line, or a ShareGPT JSONL whose
    first human turn is the prompt), at most ``max_prompts``."""
    prompts = [str(p) for p in cfg.get("prompts") or []]
    prompt_file = cfg.get("prompt_file")
    if prompt_file:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file={prompt_file!r} does not exist")
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                turns = json.loads(line)["conversations"]
                prompts.extend(t["value"] for t in turns[:1] if t["from"] == "human")
            else:
                prompts.append(line)
    max_prompts = cfg.get("max_prompts")
    prompts = prompts[:max_prompts] if max_prompts else prompts
    if not prompts:
        raise ValueError("no prompts: set `prompts=[...]` or `prompt_file=...` in the config or on the command line")
    return prompts


class MedusaGenerateRecipe:
    """Prompt(s) in, text and decoding statistics out.

    Config keys besides torchtune's usual ``model``/``checkpointer``/``tokenizer``/``device``/``dtype``/``seed``:
    ``prompts``, ``prompt_file``, ``max_prompts``, ``system_prompt``, ``chat`` (apply the chat template),
    ``max_new_tokens``, ``medusa_choices``, ``acceptance`` (greedy | typical), ``temperature``,
    ``posterior_threshold``, ``posterior_alpha``, ``compare_baseline`` and ``output_dir`` (where
    ``generate_results.json`` goes).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(dtype=cfg.dtype, device=self._device)
        if cfg.get("acceptance", "greedy") not in ACCEPTANCE_RULES:
            raise ValueError(f"acceptance={cfg.acceptance!r}; choose one of {ACCEPTANCE_RULES}")
        if cfg.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
        training.set_seed(seed=cfg.get("seed"))

    def setup(self, cfg: DictConfig) -> None:
        checkpointer = config.instantiate(cfg.checkpointer)
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
        with training.set_default_dtype(self._dtype), self._device:
            self._model: nn.Module = config.instantiate(cfg.model)
        self._model.load_state_dict(state_dict)
        self._model.eval()
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._tree = load_tree(cfg.get("medusa_choices", "mc_sim_7b_63"))

    def prompt_tokens(self, prompt: str, cfg: DictConfig) -> List[int]:
        if not cfg.get("chat", True):
            return self._tokenizer.encode(prompt, add_bos=True, add_eos=False)
        messages = [Message(role="system", content=cfg.system_prompt)] if cfg.get("system_prompt") else []
        messages.append(Message(role="user", content=prompt))
        if hasattr(self._tokenizer, "prompt_tokens"):  # SmolLM2's ChatML tokenizer
            return self._tokenizer.prompt_tokens(messages)
        # torchtune's model tokenizers: an empty assistant message opens the assistant turn
        messages.append(Message(role="assistant", content=""))
        return self._tokenizer({"messages": messages}, inference=True)["tokens"]

    def generate(self, cfg: DictConfig) -> Dict[str, Any]:
        stop_tokens = list(getattr(self._tokenizer, "stop_tokens", []))
        common = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.get("temperature", 0.0),
                      stop_tokens=stop_tokens, seed=cfg.get("seed"))
        results = []
        for prompt in read_prompts(cfg):
            tokens = self.prompt_tokens(prompt, cfg)
            medusa = medusa_generate(
                self._model,
                [tokens],
                medusa_choices=self._tree,
                acceptance=cfg.get("acceptance", "greedy"),
                posterior_threshold=cfg.get("posterior_threshold", 0.09),
                posterior_alpha=cfg.get("posterior_alpha", 0.3),
                **common,
            )
            row = {"prompt": prompt, "prompt_tokens": len(tokens),
                   "text": self._tokenizer.decode(medusa.tokens[0]), "medusa": medusa.stats.to_dict()}
            print(f"\n>>> {prompt}\n{row['text']}")
            summary = (f"tau {medusa.stats.mean_accepted:.2f} tokens/step, "
                       f"{medusa.stats.tokens_per_second:.1f} tokens/s")
            if cfg.get("compare_baseline", False):
                baseline = generate(self._model, [tokens], **common)
                row["baseline"] = baseline.stats.to_dict()
                row["same_tokens_as_baseline"] = baseline.tokens == medusa.tokens
                summary += (f"; baseline {baseline.stats.tokens_per_second:.1f} tokens/s, speedup "
                            f"{medusa.stats.tokens_per_second / max(baseline.stats.tokens_per_second, 1e-9):.2f}x, "
                            f"same output: {row['same_tokens_as_baseline']}")
            print(f"[{summary}]")
            results.append(row)
        return {"config": OmegaConf.to_container(cfg, resolve=True), "results": results,
                "mean_tau": sum(r["medusa"]["mean_accepted"] for r in results) / len(results),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json_atomically(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@config.parse
def main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="MedusaGenerateRecipe", cfg=cfg)
    recipe = MedusaGenerateRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    report = recipe.generate(cfg=cfg)
    out = Path(cfg.output_dir) / "generate_results.json"
    write_json_atomically(out, report)
    print(f"\nmean tau {report['mean_tau']:.2f} over {len(report['results'])} prompt(s); results written to {out}")


if __name__ == "__main__":
    sys.exit(main())
