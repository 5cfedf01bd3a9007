"""Strict name and shape checks of weights against a MindSpore model.

`compare_shapes` is what every loader checks with (`gm.weights.loader.load_weights` included), so a missing,
unexpected or mis-shaped key is reported the same way everywhere and nothing is dropped silently.
"""


class WeightMismatchError(ValueError):
    """Raised when a state dict does not fit a model; the message lists every offending key."""

    def __init__(self, source, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"{source} does not match the model:"]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {len(keys)} {title} key(s): " + ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} key(s) with the wrong shape:")
            lines += [f"    {k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:10]]
        super().__init__("\n".join(lines))


def compare_shapes(expected, found, source):
    """Raise WeightMismatchError unless `found` ({name: shape}) has exactly the `expected` names and shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        (k, found[k], expected[k]) for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        raise WeightMismatchError(source, missing, unexpected, mismatched)
