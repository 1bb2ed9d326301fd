"""A deployment's Celery overrides: an example, read only when ``CELERY_CONFIG_MODULE=celeryconfig`` is set.

The worker's Celery configuration is the package's own (``worker/broker/config.py``): a web app's module
of this name on ``sys.path`` can no longer replace it. To change a Celery setting for one deployment, put
it in a module like this one and name the module in ``CELERY_CONFIG_MODULE``; each lower-case name here
is applied on top of the package's configuration when the app is created.

Example::

    $ CELERY_CONFIG_MODULE=celeryconfig celery -A worker worker
"""

# Uncomment to change (the defaults are the package's; worker/broker/config.py says why each is set):
# worker_send_task_events = False    # Flower shows no tasks; saves one Redis publish per delivery
# broker_pool_limit = 32
