{
  "targets": [
    {
      "target_name": "file_ops",
      "sources": ["native/file_ops.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "conditions": [["OS!='linux'", { "type": "none" }]]
    }
  ]
}
