"""The adapters-mgr command line: main (the app and entry point), data (the data group), render."""
