"""The house rules that keep the code navigable: design references resolve, no import cycles, the solvers stay pure,
the requirements match the imports."""
import ast
import fnmatch
import os
import re
import sys
from pathlib import Path

from conftest import REPO

DESIGN = REPO / 'docs' / 'design.md'
SKIP_DIRS = {'.venv', 'results', '.git', '__pycache__', '.pytest_cache', '.ruff_cache', 'node_modules'}


def _files(pattern):
    """Repository files matching a glob on their relative path ('*.py' anywhere, 'optim/*.py'), generated and
    environment directories pruned."""
    out = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not (Path(root) == REPO / 'data' and d != '__pycache__')]
        out += [Path(root, n) for n in names if fnmatch.fnmatch(Path(root, n).relative_to(REPO).as_posix(), pattern)
                or ('/' not in pattern and fnmatch.fnmatch(n, pattern))]
    return sorted(out)


def _slug(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def design_anchors():
    return {_slug(m.group(1)) for m in re.finditer(r'^#{1,6}\s+(.+)$', DESIGN.read_text(), re.M)}


def test_every_design_reference_resolves_to_a_heading():
    anchors = design_anchors()
    assert {'model', 'layouts', 'validity', 'split', 'cost-model', 'link-latency', 'goal-program',
            'wire-protocol', 'data-roles', 'deviations'} <= anchors
    refs, bad = 0, []
    for f in _files('*.py') + _files('*.md'):
        text = f.read_text()
        found = [(m.group(1), text.count('\n', 0, m.start()) + 1)
                 for m in re.finditer(r'docs/design\.md#([\w-]+)', text)]
        if f == DESIGN:  # its own links: (#anchor)
            found += [(m.group(1), text.count('\n', 0, m.start()) + 1) for m in re.finditer(r'\]\(#([\w-]+)\)', text)]
        refs += len(found)
        bad += [f'{f.relative_to(REPO)}:{line}: #{a}' for a, line in found if a not in anchors]
        if f.suffix == '.py':
            assert not re.search(r'DESIGN\.md section \d', text), f'{f.relative_to(REPO)} cites the old spec'
    assert not bad, f'anchors that are no heading of docs/design.md: {bad}'
    assert refs >= 20


def _module_name(path):
    rel = path.relative_to(REPO).with_suffix('')
    parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
    return '.'.join(parts)


def import_graph(top_level_only):
    """{module: {repository modules it imports}} over the non-test code; with `top_level_only`, imports inside
    functions (lazy, run on call) are left out."""
    files = [f for f in _files('*.py') if 'tests' not in f.relative_to(REPO).parts]
    mods = {_module_name(f): f for f in files}
    graph = {}
    for name, f in mods.items():
        deps = set()

        def visit(node, top):
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, ast.Import):
                    targets = [a.name for a in ch.names]
                elif isinstance(ch, ast.ImportFrom) and ch.level == 0 and ch.module:
                    targets = [ch.module] + [f'{ch.module}.{a.name}' for a in ch.names]
                else:
                    targets = []
                if top or not top_level_only:
                    deps.update(t for t in targets if t in mods and t != name)
                visit(ch, top and not isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
        visit(ast.parse(f.read_text()), True)
        graph[name] = deps
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                cyc = dfs(d)
                if cyc:
                    return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cyc = dfs(m)
            if cyc:
                return cyc
    return None


def test_no_import_cycle():
    for top_level_only in (True, False):
        cyc = find_cycle(import_graph(top_level_only))
        assert cyc is None, f'import cycle ({"module level" if top_level_only else "with lazy imports"}): ' \
                            + ' -> '.join(cyc)


def test_find_cycle_finds_one():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


SOLVER_MAY_IMPORT = {'optim', 'errors', 'hyper_repvgg'}  # besides the standard library, numpy, scipy, torch


def test_solvers_import_neither_config_nor_timing_nor_accuracy():
    graph = import_graph(top_level_only=False)
    for mod, deps in graph.items():
        if mod.split('.')[0] != 'optim':
            continue
        bad = sorted(d for d in deps if d.split('.')[0] not in SOLVER_MAY_IMPORT)
        assert not bad, f'{mod} imports {bad}: the solvers take arrays, not configuration or measurement code'
    for f in _files('optim/*.py'):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                root = n.split('.')[0]
                assert root in sys.stdlib_module_names or root in SOLVER_MAY_IMPORT | {'numpy', 'scipy', 'torch'}, \
                    f'{f.relative_to(REPO)} imports {n}'


def _requirements(name):
    out = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            pkg, _, version = line.partition('==')
            assert version, f'{name}: {line!r} is not pinned (expected name==version)'
            out[pkg.lower()] = version
    return out


IMPORT_NAME = {'pillow': 'PIL'}  # distribution -> module, where they differ


def _third_party_imports(files):
    local = {p.stem for p in REPO.glob('*.py')} | {p.name for p in REPO.iterdir() if p.is_dir()}
    seen = set()
    for f in files:
        text = f.read_text()
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            seen.update(n.split('.')[0] for n in names)
        seen.update(re.findall(r"import_module\('(\w+)", text))
    return {m for m in seen if m not in sys.stdlib_module_names and m not in local}


def test_requirements_are_pinned_and_match_the_imports():
    runtime, dev = _requirements('requirements.txt'), _requirements('requirements-dev.txt')
    assert not set(runtime) & set(dev)
    code = [f for f in _files('*.py') if 'tests' not in f.relative_to(REPO).parts]
    used = _third_party_imports(code)
    runtime_mods = {IMPORT_NAME.get(p, p) for p in runtime}
    assert used - {'paramiko'} <= runtime_mods, f'imported but not in requirements.txt: {used - runtime_mods}'
    assert runtime_mods <= used, f'in requirements.txt but imported nowhere: {runtime_mods - used}'
    test_modules = {f.stem for f in _files('tests/*.py')}  # tests may import each other's helpers
    tests_use = _third_party_imports(_files('tests/*.py')) - runtime_mods - test_modules
    assert tests_use <= {IMPORT_NAME.get(p, p) for p in dev}, tests_use
    assert {'pytest', 'vermin', 'ruff'} <= set(dev)
