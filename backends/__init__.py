"""Backend services that speak the voxrelay backend protocol (docs/backend-protocol.md).

They run out of process, like any AI backend would: ``voxrelay backend echo`` and
``voxrelay backend agent`` start them.
"""
