{
  "targets": [
    {
      "target_name": "rbd_ops",
      "sources": ["native/rbd_ops.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "libraries": ["-lrbd", "-lrados"],
      "conditions": [["OS!='linux'", { "type": "none" }]]
    }
  ]
}
