# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Generate text with a Medusa model (tree decoding with KV-cache eviction), optionally side by side with the
autoregressive baseline on the same model and cache code, and write the statistics as JSON.

    tune run medusa_generate --config smollm2/135M_generate
    tune run medusa_generate --config smollm2/135M_generate prompts='["Write a haiku about rain."]'
    tune run medusa_generate --config smollm2/135M_generate run_dir=./output/smollm2_135m_medusa
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchtune import config, training, utils
from torchtune.data import Message

from torchtune_medusa import load_medusa
from torchtune_medusa._config import register_resolvers
from torchtune_medusa._files import GENERATE_RESULTS_FILE, write_json
from torchtune_medusa.generation import generate, medusa_generate, resolve_choices
from torchtune_medusa.generation._lookup import (
    check_lookup_tokens,
    check_ngram,
    DEFAULT_LOOKUP_NGRAM,
    DEFAULT_LOOKUP_TOKENS,
)
from torchtune_medusa.generation._settings import decode_compile, decode_dtype, decode_threads
from torchtune_medusa.generation._tree import validate_choices

register_resolvers()
logger = utils.get_logger("INFO")

ACCEPTANCE_RULES = ("greedy", "typical")
TREE_HELP = "a tree name (mc_sim_7b_63, chain<N>), a list of rank paths, or a tree .json saved by medusa_finetune"
#: The tree when ``medusa_choices`` is null and no tree was saved with the heads.
DEFAULT_TREE = "mc_sim_7b_63"


def choose_tree(medusa_choices: Any, num_heads: Optional[int] = None) -> List[Tuple[int, ...]]:
    """The tree to decode with, checked (before the model loads when ``num_heads`` is not known yet).

    Args:
        medusa_choices (Any): a tree name (``mc_sim_7b_63``, ``chain4``), a list of rank paths, or the path of a tree
            JSON (as saved with trained heads) or of the folder holding it; read with the library's
            :func:`~torchtune_medusa.generation.resolve_choices` / :func:`~torchtune_medusa.generation.load_tree`.
        num_heads (Optional[int]): the model's Medusa heads, when known. A named tree deeper than the heads is cut
            to their depth (as ``medusa_generate``'s default tree is); a tree given as paths or a file must fit.

    Returns:
        List[Tuple[int, ...]]: the tree's rank paths.

    Raises:
        FileNotFoundError: a missing tree file.
        ValueError: an unknown name, a file that is not a tree JSON, or an invalid tree (the message names it).
    """
    given = f"medusa_choices={medusa_choices!r}"
    if isinstance(medusa_choices, ListConfig):
        medusa_choices = OmegaConf.to_container(medusa_choices)
    named = isinstance(medusa_choices, str) and not (medusa_choices.endswith(".json") or os.path.isdir(medusa_choices))
    try:
        paths = validate_choices(resolve_choices(medusa_choices))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{given}: {e}; give {TREE_HELP}") from None
    except ValueError as e:
        raise ValueError(f"{given}: {e}{'' if named else f'; give {TREE_HELP}'}") from None
    if num_heads is None or all(len(p) <= num_heads for p in paths):
        return paths
    if named:
        logger.info(f"{given}: paths deeper than the model's {num_heads} heads left out")
        return [p for p in paths if len(p) <= num_heads]
    deepest = max(paths, key=len)
    raise ValueError(
        f"{given}: path {list(deepest)} has depth {len(deepest)} but the model has only "
        f"{num_heads} Medusa heads (model.medusa_num_heads); give a tree calibrated for these heads, or a tree name "
        "(it is cut to the heads' depth)"
    )


def _jsonl_prompts(path: Path) -> List[str]:
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            turns = json.loads(line)["conversations"]
            prompts.extend(t["value"] for t in turns[:1] if t["from"] == "human")
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            raise ValueError(
                f"prompt_file={str(path)!r} line {i + 1} is not a ShareGPT record ({type(e).__name__}: {e}); a .jsonl "
                'prompt file needs {"conversations": [{"from": "human", "value": ...}, ...]} per line (or use a '
                "text file with one prompt per line)"
            ) from None
    return prompts


def read_prompts(cfg: DictConfig) -> List[str]:
    """``prompts`` (a list of strings) and/or ``prompt_file`` (one prompt per line, or a ShareGPT JSONL whose
    first human turn is the prompt), at most ``max_prompts``.

    Raises:
        FileNotFoundError: a missing prompt file.
        ValueError: a malformed JSONL line (named), or no prompts at all.
    """
    prompts = [str(p) for p in cfg.get("prompts") or []]
    prompt_file = cfg.get("prompt_file")
    if prompt_file:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"prompt_file={prompt_file!r} does not exist; give a text file (one prompt per line) or a ShareGPT "
                ".jsonl"
            )
        if path.suffix == ".jsonl":
            prompts.extend(_jsonl_prompts(path))
        else:
            prompts.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    max_prompts = cfg.get("max_prompts")
    prompts = prompts[:max_prompts] if max_prompts else prompts
    if not prompts:
        raise ValueError("no prompts: set `prompts=[...]` or `prompt_file=...` in the config or on the command line")
    return prompts


def lookup_settings(cfg: DictConfig) -> Dict[str, Any]:
    """``lookup_tokens`` and ``lookup_ngram`` as ``medusa_generate`` arguments (the package defaults when unset).

    Raises:
        ValueError: a ``lookup_tokens`` that is not an integer >= 0 or a bad ``lookup_ngram`` (the message names it).
    """
    tokens = check_lookup_tokens(cfg.get("lookup_tokens", DEFAULT_LOOKUP_TOKENS))
    ngram = cfg.get("lookup_ngram", DEFAULT_LOOKUP_NGRAM)
    ngram = check_ngram(list(ngram) if isinstance(ngram, ListConfig) else ngram)
    return {"lookup_tokens": tokens, "lookup_ngram": ngram}


def check_sampling(cfg: DictConfig) -> None:
    """``acceptance``, ``temperature``, ``max_new_tokens`` and the lookup settings.

    Raises:
        ValueError: a value out of range (the message names it and the valid range).
    """
    if cfg.get("acceptance", "greedy") not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance={cfg.acceptance!r}; choose one of {ACCEPTANCE_RULES}")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    temperature = cfg.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(
            f"temperature={temperature!r}: must be a number >= 0 (0 = greedy decoding, > 0 samples); "
            "set e.g. temperature=0.0 or temperature=0.7"
        )
    lookup_settings(cfg)


class MedusaGenerateRecipe:
    """Prompt(s) in, text and decoding statistics out.

    Config keys besides torchtune's usual ``model``/``checkpointer``/``tokenizer``/``device``/``dtype``/``seed``:
    ``run_dir`` (a ``medusa_finetune`` output dir or ``epoch_N`` folder, loaded with
    :func:`~torchtune_medusa.load_medusa` instead of the ``model``/``checkpointer``/``tokenizer`` sections),
    ``prompts``, ``prompt_file``, ``max_prompts``, ``system_prompt``, ``chat`` (apply the chat template),
    ``max_new_tokens``, ``medusa_choices`` (null: the tree saved with ``run_dir``'s heads, else ``mc_sim_7b_63``),
    ``acceptance`` (greedy | typical), ``temperature``, ``posterior_threshold``, ``posterior_alpha``,
    ``lookup_tokens`` / ``lookup_ngram`` (lookup drafts verified next to the heads' tree), ``compare_baseline``,
    ``output_dir`` (where ``generate_results.json`` goes), and the decode settings
    ``threads`` and ``compile`` (``auto`` picks what the README's measurements found fastest; ``dtype: auto`` is
    bf16 where the hardware computes it natively).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        dtype = cfg.get("dtype", "auto")
        self._dtype = (
            decode_dtype("auto", self._device) if dtype == "auto" else training.get_dtype(dtype, device=self._device)
        )
        self._compile = decode_compile(cfg.get("compile", "auto"), self._device, self._dtype)
        threads = decode_threads(cfg.get("threads", "auto"))  # checked on every device
        if self._device.type == "cpu":
            torch.set_num_threads(threads)
        check_sampling(cfg)
        training.set_seed(seed=cfg.get("seed"))

    def setup(self, cfg: DictConfig) -> None:
        """Check the tree and the prompts, then load the model: from ``run_dir`` with
        :func:`~torchtune_medusa.load_medusa`, else from the ``model``/``checkpointer``/``tokenizer`` sections (the
        prompts are tokenized before the model loads)."""
        run_dir = cfg.get("run_dir")
        tree_cfg = cfg.get("medusa_choices")
        if tree_cfg is None and not run_dir:
            tree_cfg = DEFAULT_TREE
        if tree_cfg is not None:  # the heads' depth is checked too when the config gives it
            self._tree = choose_tree(tree_cfg, None if run_dir else cfg.model.get("medusa_num_heads"))
        prompts = read_prompts(cfg)
        if run_dir:
            run = load_medusa(run_dir, device=self._device, dtype=self._dtype)
            logger.info(f"loaded {run.checkpoint_dir} ({run.model.num_medusa_heads} Medusa heads)")
            if run.tokenizer is None:
                raise ValueError(f"run_dir={run_dir!r}: no tokenizer in {run.checkpoint_dir}")
            self._model, self._tokenizer = run.model, run.tokenizer
            self._prompts = [(prompt, self.prompt_tokens(prompt, cfg)) for prompt in prompts]
            if tree_cfg is None and run.medusa_choices is not None:
                logger.info(f"medusa_choices: the tree saved with the heads ({len(run.medusa_choices)} nodes)")
                self._tree = run.medusa_choices
                return
            tree_cfg = DEFAULT_TREE if tree_cfg is None else tree_cfg
        else:
            self._tokenizer = config.instantiate(cfg.tokenizer)
            self._prompts = [(prompt, self.prompt_tokens(prompt, cfg)) for prompt in prompts]
            self._model = self.load_model_from_config(cfg)
        # checked again now that the heads are known: a named tree is cut to their depth
        self._tree = choose_tree(tree_cfg, self._model.num_medusa_heads)

    def load_model_from_config(self, cfg: DictConfig) -> nn.Module:
        """The ``model`` section built in the decode dtype, with the ``checkpointer``'s weights, in eval mode."""
        checkpointer = config.instantiate(cfg.checkpointer)
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
        with training.set_default_dtype(self._dtype), self._device:
            model: nn.Module = config.instantiate(cfg.model)
        model.load_state_dict(state_dict)
        return model.eval()

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

    def generate_one(self, prompt: str, tokens: Sequence[int], cfg: DictConfig) -> Dict[str, Any]:
        """Decode one prompt with Medusa (and the baseline when ``compare_baseline``); print and return its row."""
        stop_tokens = list(getattr(self._tokenizer, "stop_tokens", []))
        common = dict(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.get("temperature", 0.0),
            stop_tokens=stop_tokens,
            seed=cfg.get("seed"),
            compile=self._compile,
        )
        medusa = medusa_generate(
            self._model,
            [list(tokens)],
            medusa_choices=self._tree,
            acceptance=cfg.get("acceptance", "greedy"),
            posterior_threshold=cfg.get("posterior_threshold", 0.09),
            posterior_alpha=cfg.get("posterior_alpha", 0.3),
            **lookup_settings(cfg),
            **common,
        )
        row = {
            "prompt": prompt,
            "prompt_tokens": len(tokens),
            "text": self._tokenizer.decode(medusa.tokens[0]),
            "medusa": medusa.stats.to_dict(),
        }
        print(f"\n>>> {prompt}\n{row['text']}")
        stats = medusa.stats
        summary = (
            f"tau {stats.mean_accepted:.2f} tokens/step ({stats.lookup_accepted} of {stats.new_tokens} tokens from "
            f"lookup drafts), {stats.tokens_per_second:.1f} tokens/s"
        )
        if cfg.get("compare_baseline", False):
            baseline = generate(self._model, [list(tokens)], **common)
            row["baseline"] = baseline.stats.to_dict()
            row["same_tokens_as_baseline"] = baseline.tokens == medusa.tokens
            speedup = medusa.stats.tokens_per_second / max(baseline.stats.tokens_per_second, 1e-9)
            summary += (
                f"; baseline {baseline.stats.tokens_per_second:.1f} tokens/s, speedup {speedup:.2f}x, "
                f"same output: {row['same_tokens_as_baseline']}"
            )
        print(f"[{summary}]")
        return row

    def warm_up(self, tokens: Sequence[int], cfg: DictConfig) -> None:
        """Compile the decoding step before anything is timed (a few tokens of the first prompt), so that the
        reported tokens/s measure decoding, not compiling."""
        logger.info(
            "compile=on: compiling the decoding step for this tree (a minute or so on a small CPU; compile=off)"
        )
        t0 = time.perf_counter()
        common = dict(max_new_tokens=min(16, int(cfg.max_new_tokens)), compile=True)
        medusa_generate(self._model, [list(tokens)], medusa_choices=self._tree, **lookup_settings(cfg), **common)
        if cfg.get("compare_baseline", False):
            generate(self._model, [list(tokens)], **common)
        logger.info(f"compiled in {time.perf_counter() - t0:.0f} s")

    def generate(self, cfg: DictConfig) -> Dict[str, Any]:
        """Decode every prompt. A prompt that fails (e.g. too long for the model) is reported with its error and
        the others are still decoded: the report holds a row per prompt, ``error`` on the failed ones."""
        results = []
        if self._compile and self._prompts:
            self.warm_up(self._prompts[0][1], cfg)
        for prompt, tokens in self._prompts:
            try:
                results.append(self.generate_one(prompt, tokens, cfg))
            except (ValueError, RuntimeError) as e:  # RuntimeError: e.g. out of memory for a long prompt
                logger.error(f"prompt {prompt[:60]!r} ({len(tokens)} tokens) failed: {e}")
                results.append({"prompt": prompt, "prompt_tokens": len(tokens), "error": f"{type(e).__name__}: {e}"})
        taus = [r["medusa"]["mean_accepted"] for r in results if "error" not in r]
        return {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "medusa_choices": [list(p) for p in self._tree],
            "results": results,
            "failed": sum("error" in r for r in results),
            "mean_tau": sum(taus) / len(taus) if taus else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


@config.parse
def main(cfg: DictConfig) -> int:
    config.log_config(recipe_name="MedusaGenerateRecipe", cfg=cfg)
    recipe = MedusaGenerateRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    report = recipe.generate(cfg=cfg)
    out = write_json(Path(cfg.output_dir) / GENERATE_RESULTS_FILE, report)
    done = len(report["results"]) - report["failed"]
    if done:
        print(f"\nmean tau {report['mean_tau']:.2f} over {done} prompt(s); results written to {out}")
    if report["failed"]:
        print(f"error: {report['failed']} prompt(s) failed (see 'error' in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
