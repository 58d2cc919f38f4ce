"""The product's shape, read from its source with ast: no function over 120 lines (train() reads in five
minutes), and one mixed-precision optimizer loop (one `GradScaler`) that every method trains through."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 120


def product_files(root: Path = REPO) -> list[Path]:
    """The product: the top-level modules (tests/ and benchmarks/ are not product code)."""
    return sorted(root.glob("*.py"))


def long_functions(root: Path = REPO, limit: int = MAX_LINES) -> list[str]:
    """'file:line name (n lines)' for every function or method, nested ones included, longer than `limit` lines."""
    found = []
    for path in product_files(root):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    return found


def grad_scaler_uses(root: Path = REPO) -> list[str]:
    """'file:line' of every use of GradScaler (torch.amp.GradScaler, torch.cuda.amp.GradScaler, a bare name)."""
    found = []
    for path in product_files(root):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name == "GradScaler":
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_product_function_is_longer_than_120_lines():
    assert product_files(), "no product modules found"
    assert long_functions() == []


def test_the_train_loop_is_the_one_mixed_precision_optimizer_loop():
    uses = grad_scaler_uses()
    assert len(uses) == 1 and uses[0].startswith("train.py:"), uses


def test_the_checks_see_what_they_look_for(tmp_path):
    """The two scans find a long function and a second scaler when there is one (so neither passes vacuously)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    return 1\n")
    (tmp_path / "loops.py").write_text("import torch\na = torch.amp.GradScaler('cpu')\n"
                                       "from torch.amp import GradScaler\nb = GradScaler('cpu')\n")
    assert long_functions(tmp_path) == [f"long.py:1 f ({MAX_LINES + 1} lines)"]
    assert grad_scaler_uses(tmp_path) == ["loops.py:2", "loops.py:4"]
