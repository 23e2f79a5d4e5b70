"""Server-side figures and summary tables of the pipeline's results (step 4).

`viz.summary` turns the step 0-3 artifacts into plain per-domain records and the paper table;
`viz.plots` draws figures from those records with matplotlib's Agg canvas (no display, no pyplot state).
"""
