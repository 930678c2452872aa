"""Low-rank compression of prefixes (placeholder until the compression stage lands)."""


class CompressedPrefix:  # replaced by the real implementation in the compression stage
    @classmethod
    def from_config(cls, spec, cfg):
        raise NotImplementedError
