"""A building's device profile shared by the own-data tests: five Float64 room sensors and a
Bool occupancy label, all read by one command (what `fedge task init` and the CSV tools read)."""

SENSORS_PROFILE_YAML = """\
name: "Test-Sensors"
deviceResources:
  - name: "s0"
    properties: { valueType: "Float64", readWrite: "R", minimum: -50, maximum: 50 }
  - name: "s1"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "s2"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "s3"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "s4"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "occupied"
    properties: { valueType: "Bool", readWrite: "R" }
deviceCommands:
  - name: "all"
    readWrite: "R"
    resourceOperations:
      - { deviceResource: "s0" }
      - { deviceResource: "s1" }
      - { deviceResource: "s2" }
      - { deviceResource: "s3" }
      - { deviceResource: "s4" }
      - { deviceResource: "occupied" }
"""
