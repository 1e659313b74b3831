"""A lossless SentencePiece BPE tokenizer, usable as megatron-core's dataset tokenizer.

Training (train_tokenizer) uses settings under which encode -> decode is the identity on
any text:
  - normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False:
    SentencePiece does not touch the input (no NFKC, no space squashing, no leading space);
  - byte_fallback=True: characters outside the vocabulary become <0xNN> byte pieces, so
    nothing is ever <unk> (emoji, CJK, control characters, NUL ...);
  - "\n" is a user-defined piece: SentencePiece trains on lines (sentences), so a newline
    is never inside a training sentence; as a user-defined symbol it always gets its own
    id when encoding a document with newlines;
  - allow_whitespace_only_pieces=True keeps runs of spaces as pieces ("▁▁▁▁" for indents);
  - split_digits=True: numbers are spelled digit by digit.
The one remaining hole is the literal character U+2581 "▁", which SentencePiece uses
internally for a space: SPTokenizer.tokenize encodes it as its three UTF-8 byte pieces.

Special ids: 0 <pad>, 1 <unk>, 2 <s> (bos), 3 <eod> (end of document, also eos), 4 "\n".
"""

import hashlib
import io
import json
import os
from collections import OrderedDict

import sentencepiece as spm

from mod_megatron.data.common import DataError, atomic_write_bytes

try:  # megatron-core 0.16 renamed the dataset tokenizer base class
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer as _TokenizerBase
except ImportError:  # pragma: no cover - older megatron-core
    from megatron.core.datasets.megatron_tokenizer import MegatronTokenizer as _TokenizerBase

PAD, UNK, BOS, EOD, NEWLINE = 0, 1, 2, 3, 4
EOD_PIECE = "<eod>"
META_SPACE = "\u2581"  # SentencePiece's stand-in for " "
MAX_LINE_CHARS = 2048  # longer training lines are cut into chunks (SentencePiece skips long ones)


def training_lines(texts):
    """Yield the non-empty lines of each text (what SentencePiece trains on), long ones chunked."""
    for text in texts:
        for line in text.split("\n"):
            for i in range(0, len(line), MAX_LINE_CHARS):
                yield line[i : i + MAX_LINE_CHARS]


def train_tokenizer(texts, model_path, vocab_size=4096, max_sentences=300_000, seed=1234):
    """Train a lossless BPE model on an iterable of documents and save it (atomically) to
    model_path. Training samples at most `max_sentences` lines, so it takes seconds. Returns
    model_path. Raises DataError if the corpus cannot support `vocab_size`."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_lines(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9999,
            max_sentence_length=4 * MAX_LINE_CHARS,  # bytes
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOD, eos_piece=EOD_PIECE,
            user_defined_symbols=["\n"],
            num_threads=min(16, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise DataError(f"SentencePiece training with vocab_size={vocab_size} failed: {msg}")
    atomic_write_bytes(model_path, model.getvalue())
    return model_path


class SPTokenizer(_TokenizerBase):
    """SentencePiece tokenizer with megatron-core's dataset tokenizer interface.

    tokenize(text) -> list[int] and detokenize(ids) -> str round-trip exactly. Special ids
    (pad, bos, eod) are dropped by detokenize. `sha256` identifies the model file (for
    checkpoint metadata); it is also what the megatron dataset index cache keys on.
    """

    def __init__(self, model_path):
        # The base __init__ only fills unique_identifiers/unique_description (and logs a
        # deprecation warning on every construction); we set them here ourselves.
        try:
            with open(model_path, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise DataError(f"cannot read tokenizer model {model_path}: {e.strerror}")
        self.model_path = os.path.abspath(model_path)
        self._load(proto)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("sha256", self.sha256),
             ("vocab_size", self.vocab_size)]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    def _load(self, proto):
        self._proto = proto
        self._sha256 = hashlib.sha256(proto).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except RuntimeError as e:
            raise DataError(f"{self.model_path} is not a SentencePiece model ({e})")
        if self._sp.eos_id() != EOD or self._sp.id_to_piece(NEWLINE) != "\n":
            raise DataError(f"{self.model_path} was not trained by mod_megatron.data.tokenizer "
                            f"(expected {EOD_PIECE} at id {EOD} and '\\n' at id {NEWLINE})")
        self._meta_space_ids = [
            self._sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode("utf-8")
        ]

    # pickling (DataLoader workers with spawn): ship the model bytes, not the C++ object
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_sp"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load(state["_proto"])

    # --- megatron-core tokenizer interface -------------------------------------------------

    def tokenize(self, text):
        """Text -> token ids (list of int), lossless."""
        ids = []
        for i, part in enumerate(text.split(META_SPACE)):
            if i:
                ids.extend(self._meta_space_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def detokenize(self, ids):
        """Token ids (list / numpy array / tensor) -> text; special ids decode to ""."""
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self):
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self):
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    @property
    def vocab_size(self):
        return self._sp.get_piece_size()

    @property
    def eod(self):
        return EOD

    @property
    def eos(self):
        return EOD

    @property
    def bos(self):
        return BOS

    @property
    def pad(self):
        return PAD

    @property
    def unk(self):
        return UNK

    @property
    def sha256(self):
        """Hex SHA-256 of the model file's bytes."""
        return self._sha256

    def __repr__(self):
        return f"SPTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
