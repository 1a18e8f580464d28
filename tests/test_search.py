"""The node search finds the pack by the words a user types. ComfyUI's frontend (1.32.9) searches a node's id and
display name only, every word of the query in one of them (case-insensitive)."""

import json
import textwrap

from harness.testbed import run_in_comfyui_python

SEARCHES = {
    "var sampler": "NextScaleSampler",
    "var collaborative": "NextScaleCollaborativeSampler",
    "infinity": "NextScaleLoadInfinity",
    "text sampler": "NextScaleTextSampler",
    "next-scale": "NextScaleSampler",
    "VAR": "NextScaleCollaborativeSampler",
    "kv report": "NextScaleKVReport",
}

NODE_CHECK = textwrap.dedent(
    """
    import json
    searches = json.loads(script_args[0])
    from nextscale.nodes import NODE_MODULES

    def words(text):
        return text.lower().replace("-", "").replace("(", " ").replace(")", " ").replace(",", " ").split()

    names = {}
    for node in (n for m in NODE_MODULES for n in m.NODES):
        schema = node.define_schema()
        names[schema.node_id] = words(schema.node_id) + words(schema.display_name)
    for query, node_id in searches.items():
        haystack = " ".join(names[node_id])
        assert all(w in haystack for w in words(query)), (query, node_id, names[node_id])
    print("OK")
    """
)


def test_search_words_find_the_nodes(tmp_path):


    result = run_in_comfyui_python(NODE_CHECK, json.dumps(SEARCHES), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
