"""Code shared by the lab (`lab/`) and the test harness (`tests/harness/`).

Both run local copies of the same daemons and build the same artefacts for them. What is the
same in both lives here, so that neither depends on the other; it is not part of the relay
package (`gateway/`) and is not installed with it.
"""
