"""Report: the paper's findings checked on measured metrics, tables, plots, HTML/Markdown."""
