"""Text renderings of a credit applicant.

Every threshold is a fixed, round constant chosen from what the columns mean (years, months,
money in the data set's units), never computed from records. Variants are compared on the
validation split of the training side (see NOTES.md).
"""

from __future__ import annotations

import math

import pandas as pd

from fed_dp_lora.data.sources import render_applicant


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and not pd.isna(v)


def level(v, edges, words) -> str:
    """words[i] for the first edge v < edges[i]; the last word above every edge."""
    if not _known(v):
        return "unknown"
    for edge, word in zip(edges, words):
        if v < edge:
            return word
    return words[-1]


JOB = {"fixed": "a permanent job", "partime": "a part-time job", "freelance": "a freelance job",
       "others": "another kind of job"}
HOME = {"owner": "owns a home", "rent": "rents a home", "parents": "lives with parents",
        "priv": "lives in a private home", "other": "other housing", "ignore": "unknown housing"}


def _words(row: pd.Series) -> dict[str, str]:
    income, expenses = row["Income"], row["Expenses"]
    ratio = row["Amount"] / row["Price"] if _known(row["Price"]) and row["Price"] else float("nan")
    payment = row["Amount"] / row["Time"] if row["Time"] else float("nan")
    free = income - expenses if _known(income) else float("nan")
    burden = payment / free if _known(free) and free > 0 else (float("inf") if _known(free) else float("nan"))
    return {
        "job": JOB.get(row["Job"], "an unknown job"),
        "records": "has prior default records" if row["Records"] == "yes" else "no prior default records",
        "seniority": level(row["Seniority"], (2, 5, 15), ("very short", "short", "long", "very long")),
        "age": level(row["Age"], (25, 40, 60), ("young", "adult", "middle-aged", "older")),
        "marital": row["Marital"] if _known(row["Marital"]) else "unknown marital status",
        "home": HOME.get(row["Home"], "unknown housing"),
        "income": level(income, (80, 150, 250), ("low", "medium", "high", "very high")),
        "expenses": level(expenses, (50, 75), ("low", "medium", "high")),
        "assets": level(row["Assets"], (1, 5000, 20000), ("no", "some", "substantial", "large")),
        "debt": level(row["Debt"], (1, 1000), ("no", "small", "large")),
        "amount": level(row["Amount"], (600, 1200), ("small", "medium", "large")),
        "ratio": level(ratio, (0.6, 0.9), ("low", "medium", "high")),
        "time": level(row["Time"], (30, 50), ("short", "medium", "long")),
        "burden": level(burden, (0.1, 0.25), ("light", "moderate", "heavy")),
    }


def render_words(row: pd.Series) -> str:
    """Every field as a word; no digits."""
    w = _words(row)
    return (f"{w['records']}. {w['job']}, {w['seniority']} seniority. {w['age']}, {w['marital']}, "
            f"{w['home']}. {w['income']} income, {w['expenses']} expenses, {w['assets']} assets, "
            f"{w['debt']} debt. {w['amount']} loan, {w['ratio']} loan to price ratio, {w['time']} term, "
            f"{w['burden']} payment burden.")


def render_both(row: pd.Series) -> str:
    """Words and the numbers."""
    w = _words(row)
    return (f"{w['records']}. {w['job']}, {row['Seniority']} years seniority ({w['seniority']}). "
            f"age {row['Age']} ({w['age']}), {w['marital']}, {w['home']}. "
            f"income {row['Income']:g} ({w['income']}), expenses {row['Expenses']} ({w['expenses']}), "
            f"{w['assets']} assets, {w['debt']} debt. loan {row['Amount']} ({w['amount']}), "
            f"{w['ratio']} loan to price ratio, {row['Time']} months, {w['burden']} payment burden.")


RENDERS = {"current": render_applicant, "words": render_words, "both": render_both}
