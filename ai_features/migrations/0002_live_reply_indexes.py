from django.conf import settings
from django.db import migrations, models

from ai_features.migration_operations import AddIndexConcurrentlyOnPostgreSQL


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ('ai_features', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    # Partial indexes of live replies (the limit check of every send; the Stop poll). They hold only
    # live rows; on PostgreSQL they are built without holding writes back.
    operations = [
        AddIndexConcurrentlyOnPostgreSQL(
            model_name='message',
            index=models.Index(condition=models.Q(('role', 'assistant'), ('status', 'streaming')), fields=['user', 'lease_expires_at'], name='message_user_live'),
        ),
        AddIndexConcurrentlyOnPostgreSQL(
            model_name='message',
            index=models.Index(condition=models.Q(('status', 'streaming'), ('stop_requested', True)), fields=['id'], name='message_stop_requested'),
        ),
    ]
