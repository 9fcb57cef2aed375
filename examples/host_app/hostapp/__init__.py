"""An example host application: projects whose usage is billed through tokendb."""
