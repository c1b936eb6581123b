"""The adapters-mgr command line: main (the app and entry point), data (the data group), options
(shared option types and parsers), render (tables, JSON, the lineage tree). Imports nothing: the demo
imports render while main imports the demo."""
