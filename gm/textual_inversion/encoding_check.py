"""The last check of an exported embedding before it replaces the previous file: the prompt with the word encodes
differently from the prompt without it, in each text encoder.

"Without it" is the prompt's own token ids with the word's ids left out (padded at the end, as the tokenizer pads),
not the prompt retyped without the word: a tokenizer that splits the word into ordinary pieces, so that its learned
rows are never looked up, then gives the same ids twice and the same encoding, where retyped text would still differ
through the pieces. The word's ids are those its tokens got when they were added; the file's rows are written at
those ids in the token tables for the check, and the tables' own rows are put back after it.

"Differently": the largest change of an encoder's hidden states, relative to their largest value, above
`MIN_CHANGE`. The same ids give the same states (0: the same graph on the same inputs); a word that is looked up
changes them from its position on by about their own size (another token there, the rest shifted), whatever its
rows hold.
"""
import numpy as np

from mindspore import Tensor

from gm.modules.encoders.modules import TEXT_ENCODERS
from gm.sampling import prompt_batch_at_size
from gm.textual_inversion.placeholder import expand_placeholders, placeholder_tokens

MIN_CHANGE = 1e-3  # far from both: 0 when the rows are not reached, above 0.1 for a word that is (measured, tiny model)


class EncodingCheck:
    """Called with an embedding read back from a new file: None if its word changes the encoding of its prompt in
    every text encoder, else what is wrong (for the error that keeps the previous file).

    conditioner: the model's, the words' tokens added; words: [(token, num_vectors, a prompt that uses it)]; size:
    the image size of the conditioning (the text encoders ignore it). A prompt is encoded alone (batch 1), so with
    `--blockwise_unet` at batch 1 the check runs in the training's compiled conditioner.
    """

    def __init__(self, conditioner, words, size):
        self.conditioner, self.size = conditioner, size
        self.embedders = conditioner.text_embedders()
        # where each text encoder's token ids are among the conditioner's inputs, and its width in "crossattn"
        self.inputs = [[i for i, e in enumerate(conditioner.embedders) if e is embedder][0]
                       for embedder in self.embedders]
        self.offsets = np.cumsum([0] + [e.token_embedding.weight.shape[1] for e in self.embedders])
        # token: (prompt, its ids in each text encoder as added, before anything could change the tokenizers)
        self.words = {token: (prompt, [e.tokenizer.convert_tokens_to_ids(placeholder_tokens(token, n))
                                       for e in self.embedders])
                      for token, n, prompt in words}

    def __call__(self, embedding):
        token = embedding.token
        prompt, word_ids = self.words[token]
        with_word = self.conditioner.tokenize(prompt_batch_at_size(
            expand_placeholders(prompt, {token: len(word_ids[0])}), self.size, self.size))
        without = list(with_word)
        for embedder, k, ids in zip(self.embedders, self.inputs, word_ids):
            without[k] = Tensor(left_out(with_word[k].asnumpy(), ids, embedder.tokenizer.pad_id))
        changes = self._changes(embedding, word_ids, with_word, without)
        unchanged = [name for name, change in zip(TEXT_ENCODERS, changes) if not change > MIN_CHANGE]
        if not unchanged:
            return None
        found = [int(np.isin(with_word[k].asnumpy(), ids).sum()) for k, ids in zip(self.inputs, word_ids)]
        return (f"the word {token} does not change the encoding of {prompt!r} in {' and '.join(unchanged)} (relative "
                f"change {' and '.join(f'{c:.1e}' for c in changes)}; its {len(word_ids[0])} tokens occur "
                f"{' and '.join(map(str, found))} times in the prompt's token ids): its learned rows are not reached")

    def _changes(self, embedding, word_ids, with_word, without):
        """Each text encoder's relative change between the two encodings, the file's rows in the token tables."""
        tables = [e.token_embedding for e in self.embedders]
        kept = [table.get_learned_rows() for table in tables]
        try:
            for table, rows, ids, own in zip(tables, (embedding.clip_l, embedding.clip_g), word_ids, kept):
                learned = own.copy()
                learned[np.array(ids) - table.vocab_size] = rows
                table.set_learned_rows(learned)
            a, b = (self.conditioner(*inputs)[0].asnumpy() for inputs in (with_word, without))
        finally:
            for table, own in zip(tables, kept):
                table.set_learned_rows(own)  # the training's rows, bit for bit
        changes = []
        for start, end in zip(self.offsets[:-1], self.offsets[1:]):
            states = a[..., start:end]
            changes.append(float(np.abs(states - b[..., start:end]).max() / (np.abs(states).max() + 1e-12)))
        return changes


def left_out(ids, word_ids, pad_id):
    """Token ids [1, L] without `word_ids`, padded back to L with `pad_id`."""
    kept = [i for i in ids[0] if i not in word_ids]
    return np.array([kept + [pad_id] * (ids.shape[1] - len(kept))], ids.dtype)
