"""HuggingFace tokenizer for a mod_megatron export: the stack's lossless SentencePiece BPE model.

Self-contained (imports sentencepiece and transformers). Encodes exactly like
mod_megatron.data.tokenizer.SPTokenizer.tokenize: no BOS is added, the text is not normalised, and a
literal U+2581 (SentencePiece's internal space marker) is encoded as its three UTF-8 byte pieces.
Decoding is SentencePiece's own decode, which drops the special ids (<pad>, <s>, <eod>).
"""
import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

META_SPACE = "\u2581"


class ModGPTTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token="<s>", eos_token="<eod>", unk_token="<unk>", pad_token="<pad>",
                 **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(vocab_file)
        self.meta_space_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode("utf-8")]
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         **kwargs)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    def get_vocab(self):
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def encode_ids(self, text):
        """Text -> ids, exactly as the training stack tokenizes (lossless, no BOS)."""
        ids = []
        for i, part in enumerate(text.split(META_SPACE)):
            if i:
                ids.extend(self.meta_space_ids)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def tokenize(self, text, **kwargs):
        # The whole text goes to SentencePiece: special-token strings in it are not special.
        return [self.sp.id_to_piece(i) for i in self.encode_ids(text)]

    def _tokenize(self, text, **kwargs):
        return self.tokenize(text)

    def _convert_token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens):
        return self.sp.decode([self.sp.piece_to_id(t) for t in tokens])

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.sp.decode([int(i) for i in token_ids])

    def save_vocabulary(self, save_directory, filename_prefix=None):
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
