# Every ROS process started from here stays on loopback; each `make` gets its own DDS domain
# unless the caller chose one. Robots keep their own settings: this is for local runs only.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= $(shell python3 -c "import os; print(100 + os.getpid() % 100)")

PYTHON_BASE ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED ?= ../shared
CHECKPOINT ?=
PYTEST_ARGS ?=

.PHONY: venv test test-slow test-registry bench demo clean

venv: $(STAMP)

# Pinned dependencies; the ROS 2 wheels are for pip-only machines (never on a ROS 2 distro,
# where colcon + rosdep provide rclpy and the messages).
$(STAMP): requirements.txt requirements-ros.txt setup.py
	$(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-ros.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# pip resolves requirements-robot.txt for the distros' Pythons (PyPI, no downloads of wheels).
test-registry: $(STAMP)
	$(PY) -m pytest -m registry -s test/test_robot_requirements.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/model_speed.py
	$(PY) bench/train_step.py
	$(PY) bench/node_latency.py

demo: $(STAMP)
	CHECKPOINT=$(CHECKPOINT) $(PY) -m diffsql_ros.demo --shared $(SHARED) --out demo_out

clean:
	rm -rf demo_out runs .pytest_cache
