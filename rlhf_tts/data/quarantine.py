"""The quarantine list: unusable inputs with the reason, written as `<output_dir>/quarantine.csv`."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class QuarantinedItem:
    path: str
    reason: str


class Quarantine:
    def __init__(self) -> None:
        self.items: list[QuarantinedItem] = []

    def add(self, path: str | Path, reason: str) -> None:
        self.items.append(QuarantinedItem(str(path), reason))

    def extend(self, items: list[QuarantinedItem]) -> None:
        self.items.extend(items)

    def __len__(self) -> int:
        return len(self.items)

    def reason_counts(self) -> Counter[str]:
        """Counts by the reason's kind (the text before any parenthesis or colon detail)."""
        return Counter(item.reason.split(" (")[0].split(":")[0] for item in self.items)

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            for item in sorted(self.items, key=lambda i: (i.path, i.reason)):
                writer.writerow([item.path, item.reason])

    @classmethod
    def read_csv(cls, path: str | Path) -> "Quarantine":
        quarantine = cls()
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                quarantine.add(row["path"], row["reason"])
        return quarantine
