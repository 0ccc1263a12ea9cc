"""A small byte-level BPE tokenizer trained locally on text that ships with Python.

Nothing is downloaded: the corpus is CPython's `pydoc_data.topics` plus the docstrings of a fixed
list of stdlib modules, fed in a fixed order, so training is deterministic and the result is cached
under `~/.cache/kpop/tokenizer/<key>/` (or `$KPOP_CACHE/tokenizer/<key>/`). The directory holds
`tokenizer.json` + `tokenizer_config.json` (with the chat template of kpop/policy/chat.py), so
`transformers.AutoTokenizer.from_pretrained(dir)` loads it too.

    tok = get_tokenizer()              # PreTrainedTokenizerFast, vocab 1024
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kpop.policy.chat import CHAT_TEMPLATE, SPECIAL_TOKENS

FORMAT_VERSION = 2  # bump when the corpus, the pre-tokenizer, the special tokens or the template change
DEFAULT_VOCAB_SIZE = 1024
_DOC_MODULES = (
    "abc argparse asyncio base64 bisect collections contextlib copy csv dataclasses datetime decimal "
    "difflib enum fractions functools glob hashlib heapq html itertools json logging math operator os "
    "pathlib pickle queue random re shlex shutil socket sqlite3 statistics string struct subprocess "
    "tempfile textwrap threading time timeit typing unittest urllib.parse uuid zipfile"
).split()


# The chat format's own fixed pieces. Pydoc text rarely says "assistant" or `"arguments": {`, so
# without these every turn header and tool call would cost the model a dozen tokens.
_CHAT_PIECES = ("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>tool\n<tool_response>\n",
                "\n</tool_response><|im_end|>\n", '<tool_call>\n{"name": "', '", "arguments": {"', '"}}\n</tool_call>')


def training_corpus() -> list[str]:
    """Documentation text shipped with CPython, in a fixed order, plus the chat format's pieces."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)] + list(_CHAT_PIECES) * 200
    with warnings.catch_warnings():  # some modules warn on attribute access (typing.io, ...)
        warnings.simplefilter("ignore", DeprecationWarning)
        texts += _module_docstrings()
    return texts


def _module_docstrings() -> list[str]:
    texts = []
    for name in _DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # e.g. a Python built without sqlite3
            continue
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if doc and getattr(obj, "__module__", None) == mod.__name__:
                texts.append(doc)
    return texts


def _cache_root() -> Path:
    return Path(os.environ.get("KPOP_CACHE", Path.home() / ".cache" / "kpop")) / "tokenizer"


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: list[str] | None = None) -> Tokenizer:
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed the 256 byte tokens + {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    # one token per digit (as Llama and DeepSeek do): a number then reads the same wherever it
    # appears (" 43" in a question, "43" in a tool call), so a small model can copy it token by token
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0.. in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else training_corpus(), trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "unk_token": None,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|pad|>")],
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def get_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The local tokenizer, trained once per (format version, vocab size) and cached on disk."""
    # docstrings differ between Python versions, so the corpus (and the key) does too: a cluster
    # must share one tokenizer directory (policy.tokenizer) or one Python version
    corpus_id = f"{FORMAT_VERSION}:{vocab_size}:{sys.version_info[:2]}:{CHAT_TEMPLATE}:{SPECIAL_TOKENS}"
    key = hashlib.sha256(corpus_id.encode()).hexdigest()[:16]
    path = _cache_root() / f"bpe{vocab_size}-{key}"
    if not (path / "tokenizer_config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # train into a temp dir and rename: concurrent processes never read a half-written cache
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        save_tokenizer(train_tokenizer(vocab_size), tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race; its copy is identical
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return load_tokenizer(path)
