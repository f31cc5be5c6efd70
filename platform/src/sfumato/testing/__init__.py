"""Stand-ins that tests and benchmarks share: tiny random models of the real classes (tiny), the
scripted judge that votes on A/B trials in place of people (judge), and an app served on a
loopback port (served). Never imported by the product: tests/unit/test_imports.py checks."""
