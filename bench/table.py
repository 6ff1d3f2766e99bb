"""The benches' one way to print their figures: a Markdown table, as README shows them."""


def print_table(machine: str, rows: list[tuple[str, float]]) -> None:
    print(machine)
    width = max(len(label) for label, _ in rows)
    print(f"| {'measure':{width}} | {'value':>8} |\n|{'-' * (width + 2)}|{'-' * 10}|")
    for label, value in rows:
        print(f"| {label:{width}} | {value:8.2f} |")
