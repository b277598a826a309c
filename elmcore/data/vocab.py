"""Which byte value each input (and output) channel of a character-level model stands for.

A character model's inputs are one-hot over its vocabulary and its outputs are logits
over the same symbols, in the same order: channel ``i`` is byte ``symbols[i]``. The
vocabulary is a property of the data the model was trained on (``vocab=corpus`` keeps
only the bytes the corpus holds), so it travels with the model file (entry ``vocab``,
elmcore.training.checkpoint) and the run (``run.json``), and ``elm predict`` /
``elm sample`` encode and decode text with it.

Text is UTF-8: a character outside ASCII is several bytes, each its own symbol.
"""

import numpy as np

from elmcore.errors import DataError


def _shown(character):
    """A character as a reader can see it in an error message: 'a', '\\n', 'é' (U+00E9)."""
    shown = repr(character)
    if len(character) == 1 and (ord(character) > 126 or not character.isprintable()):
        shown += f" (U+{ord(character):04X})"
    return shown


class Vocabulary:
    """The byte values of a model's channels, in channel order.

    Parameters
    ----------
    symbols : the byte values 0..255, one per channel, each at most once.
    """

    def __init__(self, symbols, source="vocabulary"):
        values = np.asarray(symbols)
        if values.ndim != 1 or len(values) < 1 or values.dtype.kind not in "iu":
            raise DataError(f"{source}: a vocabulary is a non-empty list of byte values, got "
                            f"{values.dtype} {values.shape}")
        if values.min() < 0 or values.max() > 255:
            raise DataError(f"{source}: vocabulary entries must be byte values 0..255")
        if len(np.unique(values)) != len(values):
            raise DataError(f"{source}: vocabulary lists a byte value twice")
        self.symbols = values.astype(np.uint8)
        # byte value -> channel, −1 where the byte has none
        self.index_of = np.full(256, -1, np.int64)
        self.index_of[self.symbols] = np.arange(len(self.symbols))

    @property
    def size(self):
        return int(len(self.symbols))

    def __len__(self):
        return self.size

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and np.array_equal(self.symbols, other.symbols)

    # ---- encoding ------------------------------------------------------------------------
    def encode_bytes(self, data, what="text"):
        """int64 channel indices of a byte string; a byte outside the vocabulary is a DataError naming it."""
        raw = np.frombuffer(bytes(data), np.uint8)
        tokens = self.index_of[raw]
        missing = np.nonzero(tokens < 0)[0]
        if len(missing):
            at = int(missing[0])
            raise DataError(f"{what} holds byte 0x{raw[at]:02x} (at byte {at}), which is not in the model's "
                            f"vocabulary of {self.size} symbols ({self.describe()})")
        return tokens

    def encode_text(self, text, what="text"):
        """int64 channel indices of ``text`` (UTF-8); a character outside the vocabulary is a DataError naming it."""
        raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
        tokens = self.index_of[raw]
        missing = np.nonzero(tokens < 0)[0]
        if len(missing):
            # The character holding that byte: count the characters' first bytes up to it.
            position = int(np.count_nonzero((raw[:missing[0] + 1] & 0xC0) != 0x80)) - 1
            raise DataError(f"{what} holds the character {_shown(text[position])} (character {position}), "
                            f"which is not in the model's vocabulary of {self.size} symbols ({self.describe()})")
        return tokens

    def one_hot(self, tokens):
        """(..., T) channel indices -> (..., T, V) uint8 one-hot: the model's input encoding."""
        tokens = np.asarray(tokens, np.int64)
        X = np.zeros(tokens.shape + (self.size,), np.uint8)
        np.put_along_axis(X, tokens[..., None], 1, axis=-1)
        return X

    def decode(self, tokens):
        """Channel indices -> the bytes they stand for."""
        return self.symbols[np.asarray(tokens, np.int64)].tobytes()

    def decode_text(self, tokens):
        """Channel indices -> text; bytes that are not UTF-8 become U+FFFD."""
        return self.decode(tokens).decode("utf-8", errors="replace")

    # ---- storage ----------------------------------------------------------------------------
    def to_list(self):
        """The byte values as plain integers (for JSON)."""
        return [int(v) for v in self.symbols]

    @classmethod
    def from_stored(cls, value, source):
        """A vocabulary read back from a model file or run.json; anything else is a DataError naming ``source``."""
        if isinstance(value, (list, tuple)) and not all(isinstance(v, int) and not isinstance(v, bool)
                                                        for v in value):
            raise DataError(f"{source}: vocabulary entries must be integers (byte values)")
        return cls(np.asarray(value) if isinstance(value, (list, tuple)) else value, source)

    def describe(self, limit=24):
        """The symbols as text: '\\n', ' ', '.', 'a', … (the first ``limit``)."""
        shown = [repr(bytes([v]).decode("latin-1")) if v < 128 else f"0x{v:02x}" for v in self.symbols[:limit]]
        more = f", … {self.size - limit} more" if self.size > limit else ""
        return ", ".join(shown) + more
