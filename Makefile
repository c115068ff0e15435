# The two commands a new user needs; each does all of its own set-up.
#   make demo   run the engine end to end on its embedded default (SQLite)
#   make test   lint, type-check and run every test tier
.PHONY: demo test

demo:
	./scripts/bootstrap.sh
	./scripts/demo.sh

test:
	./scripts/bootstrap.sh
	./scripts/test.sh
