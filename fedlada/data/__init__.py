"""Data: the JSONL record contract, its validation, adapters for public data sets, and the built-in benchmark.

Light to import (``datasets`` is imported only inside ``load_hub_dataset``).
"""

from fedlada.data.benchmark import BenchmarkLayout, ClientFiles, make_benchmark, steps_of
from fedlada.data.domains import DOMAINS, GENERAL, Domain, Rule
from fedlada.data.formats import FORMATS, detect_format
from fedlada.data.hub import KNOWN_HUB_DATASETS, load_hub_dataset
from fedlada.data.records import Problem, Record
from fedlada.data.stream import iter_records, scan_problems
from fedlada.data.validate import DEFAULT_MAX_RECORD_BYTES, read_records, scan_file, validate_files, write_records

__all__ = [
    "BenchmarkLayout", "ClientFiles", "DEFAULT_MAX_RECORD_BYTES", "DOMAINS", "Domain", "FORMATS", "GENERAL",
    "KNOWN_HUB_DATASETS", "Problem", "Record", "Rule", "detect_format", "iter_records", "load_hub_dataset",
    "make_benchmark", "read_records", "scan_file", "scan_problems", "steps_of", "validate_files", "write_records",
]
